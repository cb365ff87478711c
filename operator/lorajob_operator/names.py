"""Kubernetes name and value syntax: validators that explain the fix, and name builders.

Every check returns the value or raises ValueError with a message meant for a
person reading `kubectl describe`: what is wrong and what to write instead.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from loraops_contract import rules
from loraops_contract.rules import Rule

__all__ = [
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "EXTENDED_RESOURCE",
    "IMAGE",
    "LABEL_KEY",
    "LABEL_VALUE",
    "QUANTITY",
    "Syntax",
    "check_dns_label",
    "check_dns_subdomain",
    "check_extended_resource_name",
    "check_image",
    "check_label_key",
    "check_label_value",
    "check_quantity",
    "extended_resource_rules",
    "label_key_rule",
    "label_safe",
    "quantity_rules",
    "short_hash",
]


@dataclass(frozen=True)
class Syntax:
    """A Kubernetes value syntax: an RE2-compatible pattern for the whole value, a length
    limit and the fix to suggest. `rule()` is the same check for a spec field, enforced
    by pydantic and (as CEL) by the CRD with one message."""

    pattern: str
    max_length: int
    fix: str

    def ok(self, value: str) -> bool:
        return len(value) <= self.max_length and rules.matches(self.pattern)[1](value)

    def check(self, value: str, what: str) -> str:
        if not self.ok(value):
            raise ValueError(f"{value!r} is not a valid {what}; {self.fix}")
        return value

    def rule(self, what: str) -> Rule:
        return rules.regex_rule(
            self.pattern, f"not a valid {what}; {self.fix}", max_length=self.max_length
        )


_DNS_LABEL_RE = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN_RE = rf"{_DNS_LABEL_RE}(?:\.{_DNS_LABEL_RE})*"
_NAME_RE = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
# A label name of at most 63 characters, as part of a longer value.
_NAME63_RE = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"

DNS_LABEL = Syntax(
    _DNS_LABEL_RE,
    63,
    "use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit",
)
DNS_SUBDOMAIN = Syntax(
    _DNS_SUBDOMAIN_RE,
    253,
    "use lowercase letters, digits, '-' and '.' (at most 253 characters, starting and "
    "ending with a letter or digit)",
)
LABEL_VALUE = Syntax(
    rf"(?:{_NAME_RE})?",
    63,
    "use at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
)
# 253 (prefix) + "/" + 63 (name).
LABEL_KEY = Syntax(
    rf"(?:{_DNS_SUBDOMAIN_RE}/)?{_NAME63_RE}",
    317,
    "use [prefix/]name where name has at most 63 letters, digits, '-', '_' or '.' and "
    "prefix is a DNS subdomain (e.g. nvidia.com/gpu.product)",
)
EXTENDED_RESOURCE = Syntax(
    rf"{_DNS_SUBDOMAIN_RE}/{_NAME63_RE}",
    317,
    "use <vendor-domain>/<resource> such as nvidia.com/gpu or nvidia.com/mig-1g.10gb",
)
# Kubernetes quantity: a non-negative decimal with an optional binary/decimal suffix
# or exponent. Signs are left out on purpose: a negative request is never meant.
_QUANTITY_SUFFIX = r"(?:Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?"
QUANTITY = Syntax(
    rf"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+){_QUANTITY_SUFFIX}",
    64,
    "use a number with an optional suffix such as 8, 500m, 16Gi or 64G",
)
_ZERO_QUANTITY = rf"(?:0+(?:\.0*)?|\.0+){_QUANTITY_SUFFIX}"
# The reference grammar of container images, simplified: [registry[:port]/]path[:tag][@digest].
IMAGE = Syntax(
    # A first component is a registry only with a dot, a port or as localhost (Docker's rule).
    r"(?:(?P<registry>(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+)(?::[0-9]+)?"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]+)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?",
    512,
    "use [registry[:port]/]repository[:tag][@sha256:digest] with a lowercase repository, "
    "e.g. ghcr.io/loraops/lora-trainer:0.1.0",
)
_BUILTIN_RESOURCE = r"(?:[^/]*\.)?kubernetes\.io/.*"
_BUILTIN_FIX = (
    "is a built-in resource, not a GPU device; use the device plugin's name such as nvidia.com/gpu"
)


def extended_resource_rules(what: str) -> tuple[Rule, ...]:
    """The spec rules of a device-plugin resource name (a GPU or MIG slice)."""
    cel, builtin = rules.matches(_BUILTIN_RESOURCE)
    return (
        EXTENDED_RESOURCE.rule(what),
        Rule(cel=f"!{cel}", message=_BUILTIN_FIX, check=lambda v: not builtin(v)),
    )


def quantity_rules(what: str) -> tuple[Rule, ...]:
    """The spec rules of a CPU or memory quantity: its syntax, and greater than zero."""
    cel, zero = rules.matches(_ZERO_QUANTITY)
    return (
        QUANTITY.rule(what),
        Rule(
            cel=f"!{cel}",
            message=f"the {what} must be greater than zero",
            check=lambda v: not zero(v),
        ),
    )


def label_key_rule(subject: str) -> tuple[str, Callable[[str], bool]]:
    """The label-key check on `subject` (a CEL variable, e.g. a map key) and in Python."""
    cel, ok = rules.matches(LABEL_KEY.pattern, subject=subject)
    limit = LABEL_KEY.max_length
    return f"(size({subject}) <= {limit} && {cel})", lambda v: len(v) <= limit and ok(v)


def short_hash(text: str, length: int = 8) -> str:
    """A stable hex digest prefix, used to keep truncated names unique."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def check_dns_label(value: str, what: str = "name") -> str:
    """RFC 1123 label: what Kubernetes requires of most short names (<= 63 chars)."""
    return DNS_LABEL.check(value, what)


def check_dns_subdomain(value: str, what: str = "name") -> str:
    """RFC 1123 subdomain: the rule for Secret, PriorityClass and most object names."""
    return DNS_SUBDOMAIN.check(value, what)


def check_label_value(value: str, what: str = "label value") -> str:
    return LABEL_VALUE.check(value, what)


def check_label_key(value: str, what: str = "label key") -> str:
    """A qualified name: optional DNS-subdomain prefix, '/', then a name of <= 63 chars."""
    prefix, _, name = value.rpartition("/")
    ok = bool(name) and len(name) <= 63 and bool(_LABEL_NAME.fullmatch(name))
    if prefix:
        ok = ok and len(prefix) <= 253 and DNS_SUBDOMAIN.ok(prefix)
    if not ok:
        raise ValueError(f"{value!r} is not a valid {what}; {LABEL_KEY.fix}")
    return value


def check_extended_resource_name(value: str) -> str:
    """A device-plugin resource such as nvidia.com/gpu or nvidia.com/mig-1g.10gb."""
    prefix, sep, name = value.partition("/")
    if (
        not sep
        or "/" in name
        or not prefix
        or len(prefix) > 253
        or not DNS_SUBDOMAIN.ok(prefix)
        or not name
        or len(name) > 63
        or not _LABEL_NAME.fullmatch(name)
    ):
        raise ValueError(f"{value!r} is not an extended resource name; {EXTENDED_RESOURCE.fix}")
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        raise ValueError(f"{value!r} {_BUILTIN_FIX}")
    return value


def check_quantity(value: str, what: str = "quantity") -> str:
    """A positive Kubernetes quantity such as 8, 500m, 16Gi or 1.5."""
    m = _QUANTITY.fullmatch(value)
    if not m:
        hint = ""
        bad_units = {"gb": "G or Gi", "mb": "M or Mi", "kb": "k or Ki", "tb": "T or Ti"}
        for unit, fix in bad_units.items():
            if value.lower().endswith(unit):
                hint = f" (Kubernetes spells {unit.upper()} as {fix}, e.g. 16Gi)"
        raise ValueError(f"{value!r} is not a Kubernetes {what}; {QUANTITY.fix}{hint}")
    if float(m["num"]) == 0:
        raise ValueError(f"{value!r}: the {what} must be greater than zero")
    return value


def check_image(value: str) -> str:
    if not IMAGE.ok(value):
        raise ValueError(f"{value!r} is not a container image reference; {IMAGE.fix}")
    return value


_LABEL_NAME = re.compile(_NAME_RE, re.ASCII)
_QUANTITY = re.compile(rf"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+){_QUANTITY_SUFFIX}", re.ASCII)


def label_safe(value: str) -> str:
    """`value` if it is a valid label value, else a truncated form with a hash suffix.

    Object names may be 253 characters but label values only 63; the hash keeps two
    long names that share a prefix apart.
    """
    if len(value) <= 63 and _LABEL_NAME.fullmatch(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:54].strip("-_.")
    return f"{cleaned}-{short_hash(value)}" if cleaned else short_hash(value)
