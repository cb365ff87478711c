"""Kubernetes name and value syntax: validators that explain the fix, and name builders.

Every check returns the value or raises ValueError with a message meant for a
person reading `kubectl describe`: what is wrong and what to write instead.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "check_dns_label",
    "check_dns_subdomain",
    "check_extended_resource_name",
    "check_image",
    "check_label_key",
    "check_label_value",
    "check_quantity",
    "label_safe",
    "short_hash",
]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Kubernetes quantity: a non-negative decimal with an optional binary/decimal suffix
# or exponent. Signs are left out on purpose: a negative request is never meant.
_QUANTITY = re.compile(
    r"^(?P<num>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
# The reference grammar of container images, simplified: [registry[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    # A first component is a registry only with a dot, a port or as localhost (Docker's rule).
    r"^(?:(?P<registry>(?:localhost|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+)(?::[0-9]+)?"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?:[0-9]+)/)?"
    r"(?P<path>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)


def short_hash(text: str, length: int = 8) -> str:
    """A stable hex digest prefix, used to keep truncated names unique."""
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def check_dns_label(value: str, what: str = "name") -> str:
    """RFC 1123 label: what Kubernetes requires of most short names (<= 63 chars)."""
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what}; use at most 63 lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"
        )
    return value


def check_dns_subdomain(value: str, what: str = "name") -> str:
    """RFC 1123 subdomain: the rule for Secret, PriorityClass and most object names."""
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a valid {what}; use lowercase letters, digits, '-' and '.' "
            "(at most 253 characters, starting and ending with a letter or digit)"
        )
    return value


def check_label_value(value: str, what: str = "label value") -> str:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        raise ValueError(
            f"{value!r} is not a valid {what}; use at most 63 letters, digits, '-', '_' "
            "and '.', starting and ending with a letter or digit"
        )
    return value


def check_label_key(value: str, what: str = "label key") -> str:
    """A qualified name: optional DNS-subdomain prefix, '/', then a name of <= 63 chars."""
    prefix, _, name = value.rpartition("/")
    ok = bool(name) and len(name) <= 63 and bool(_LABEL_NAME.match(name))
    if prefix:
        ok = ok and len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.match(prefix))
    if not ok:
        raise ValueError(
            f"{value!r} is not a valid {what}; use [prefix/]name where name has at most "
            "63 letters, digits, '-', '_' or '.' and prefix is a DNS subdomain "
            "(e.g. nvidia.com/gpu.product)"
        )
    return value


def check_extended_resource_name(value: str) -> str:
    """A device-plugin resource such as nvidia.com/gpu or nvidia.com/mig-1g.10gb."""
    prefix, sep, name = value.partition("/")
    if (
        not sep
        or "/" in name
        or not prefix
        or len(prefix) > 253
        or not _DNS_SUBDOMAIN.match(prefix)
        or not name
        or len(name) > 63
        or not _LABEL_NAME.match(name)
    ):
        raise ValueError(
            f"{value!r} is not an extended resource name; use <vendor-domain>/<resource> "
            "such as nvidia.com/gpu or nvidia.com/mig-1g.10gb"
        )
    if prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io"):
        raise ValueError(
            f"{value!r} is a built-in resource, not a GPU device; use the device plugin's "
            "name such as nvidia.com/gpu"
        )
    return value


def check_quantity(value: str, what: str = "quantity") -> str:
    """A positive Kubernetes quantity such as 8, 500m, 16Gi or 1.5."""
    m = _QUANTITY.match(value.strip()) if value == value.strip() else None
    if not m:
        hint = ""
        bad_units = {"gb": "G or Gi", "mb": "M or Mi", "kb": "k or Ki", "tb": "T or Ti"}
        for unit, fix in bad_units.items():
            if value.lower().endswith(unit):
                hint = f" (Kubernetes spells {unit.upper()} as {fix}, e.g. 16Gi)"
        raise ValueError(
            f"{value!r} is not a Kubernetes {what}; use a number with an optional suffix "
            f"such as 8, 500m, 16Gi or 64G{hint}"
        )
    if float(m["num"]) == 0:
        raise ValueError(f"{value!r}: the {what} must be greater than zero")
    return value


def check_image(value: str) -> str:
    if len(value) > 512 or not _IMAGE.match(value):
        raise ValueError(
            f"{value!r} is not a container image reference; use "
            "[registry[:port]/]repository[:tag][@sha256:digest] with a lowercase repository, "
            "e.g. ghcr.io/loraops/lora-trainer:0.1.0"
        )
    return value


def label_safe(value: str) -> str:
    """`value` if it is a valid label value, else a truncated form with a hash suffix.

    Object names may be 253 characters but label values only 63; the hash keeps two
    long names that share a prefix apart.
    """
    if len(value) <= 63 and _LABEL_NAME.match(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:54].strip("-_.")
    return f"{cleaned}-{short_hash(value)}" if cleaned else short_hash(value)
